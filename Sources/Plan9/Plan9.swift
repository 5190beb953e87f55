// Plan9 module.
