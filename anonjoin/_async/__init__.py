"""The client's I/O layer: it performs the core's decisions with aiohttp (client, guest driver,
service application, http, TLS, Azure AD credentials, target settings). Imports no load runner or CLI."""
