// UVMCLI module.
