"""Live stock: the ``stockChanged`` subscription across server instances.

``hub.py`` reads the Redis stock-event stream once per process and fans events out,
``render.py`` executes a selection once per event and render group, ``connection.py`` writes
ready frames to one WebSocket with a bounded queue per subscription, ``transport.py`` is the
graphql-transport-ws handler, ``subscription.py`` opens a subscription (cursor check,
register, replay, live) and ``events.py`` holds the event, filter and cursor rules.
"""
