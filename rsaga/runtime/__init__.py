"""The runtime: workers, schedulers and the consumer-group plumbing under them.

Nothing here imports the CLI, the health report or metrics: they read Redis and
plug in through `rsaga.observe.Observer`; they do not feed the runtime.
"""
