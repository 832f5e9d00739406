"""shuttle's remote side: uploaded over ssh stdin, re-creates the tunnelled connections.

Only the standard library, shuttle_protocol and msgpack's pure-Python modules may be imported
here, because this package is what the client uploads to a server that has nothing installed.
"""
