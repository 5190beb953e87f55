// placeholder until the archive branch's tests land
