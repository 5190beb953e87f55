import GuestAgent

// Before the first await: nothing runs on a dispatch worker thread yet.
GuestAgent.preparePID1IfNeeded()
await GuestAgent.main()
