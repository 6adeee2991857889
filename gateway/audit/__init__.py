"""The audit room: the durable chained log the gateway writes, its stream to the hub, tamper
signals, and the ``fieldgate audit`` verbs (the chain itself is pure, in ``gateway.core.audit``).

    log.py     the durable log: group commit to audit.db, signed heads, its own quota
    stream.py  the gateway identity's queue over the log: messages of lines, at least once
    tamper.py  tamper signals: pure checks at start, watchers while running
    room.py    what the gateway calls at start, while running and at stop
    files.py   the JSON-lines form; audit.db and hub records read the same way
    cli.py     ``fieldgate audit verify|show``
"""
