"""hushchat's trio transport: the relay server and the client library."""
