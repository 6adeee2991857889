"""`fieldgate loadtest`: a simulated fleet end to end, measured at the hub side."""
