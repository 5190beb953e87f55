// Settings module.
