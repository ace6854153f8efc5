"""The protocol the workers serve: `messages` (what may cross a socket), `codec` (how it travels),
`limits` (the bounds both ends hold to). Import the module you need; this package imports nothing."""
