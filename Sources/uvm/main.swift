import UVMCLI

UVM.run()
