"""How the gateway knows a worker is there: each attempt's heartbeat
(``heartbeat``) and the worker's presence (``presence``)."""
