"""shuttle's wire protocol: one msgpack schema and its sans-IO codecs.

Nothing here touches a socket: the programs feed bytes in and get messages out (h11's way).
The package must import on Python 3.8 with only msgpack, because it is uploaded to servers.
"""

PROTOCOL_VERSION = 4  # 3: Widen; 4: Pace
