"""What both ends of the tunnel run, shuttle-client and shuttle-agent: the asyncio driver of
the multiplexed pipe and its channels, the open-file limit, the nameserver list. It needs
sockets, so it cannot live in shuttle_protocol, which stays sans-IO; it is uploaded with
the agent, so it keeps to Python 3.8 and the standard library."""
