import UVMCLI

UVM.main()
