import GuestAgent

await GuestAgent.main()
