"""What shuttle's two programs on the user's host share, shuttle-client and
shuttle-firewalld: code that needs the operating system (sockets, the service manager), so
it cannot live in shuttle_protocol, which stays sans-IO, and that the agent never needs, so
it is not uploaded."""
