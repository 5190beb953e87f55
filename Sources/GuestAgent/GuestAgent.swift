// GuestAgent module.
