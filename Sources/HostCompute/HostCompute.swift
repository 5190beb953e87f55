// HostCompute module.
