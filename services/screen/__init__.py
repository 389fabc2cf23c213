"""Screen input: the pointer and keyboard of a screen source's X display, through XTest.

Off unless a screen source asks for it (`[sources.NAME] input = true`); it then runs inside
that source's capture process (the same display), whose offers the hub's `screen.*`
commands reach. docs/agent-tools.md has the whole story.

    keys.py      key names and chords -> X keysyms; characters -> keysyms
    monitors.py  the display's monitors (RandR 1.5, as the screen source numbers them); points on them
    xtest.py     XInput: click, type (any Unicode), keys, scroll on one X connection
    locate.py    an element described in words -> a box from the vision provider -> a point on the screen
    offers.py    the capture service's `input.*` offers, events and metrics
"""
