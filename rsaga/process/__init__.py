"""Process managers: stateful long-running processes that react to events and time.

A process type names itself, maps incoming events to a process instance id
(`correlate`), folds the events of its own stream into state (`apply`), and
decides what to do on each trigger (`decide`): events on its own stream,
commands to execute, timeouts to schedule or cancel, a retry, completion or
failure. Process state lives only in its stream ``<type>-<id>``.

One trigger is one *step*, run as a command through the executor:

1. read the process stream and fold it (framework events into `ProcessInfo`,
   the rest into the user's state);
2. drop the trigger if the process is finished, or if it is a timeout whose
   token is no longer the current one (the process moved on);
3. decide, and commit atomically: the step's events (tagged with the step's
   idempotency key), the timeouts it schedules or cancels, the lifecycle index,
   and a `CommandsIssued` record of the commands it decided;
4. execute those commands, each with its own idempotency key.

A version conflict (an event and a timeout of one process at once) re-runs
the step on fresh state, so a timeout that became stale is discarded. A
redelivered trigger finds its key in the stream and only completes step 4,
whose commands apply once. So every effect happens once over at-least-once
delivery, whatever order triggers arrive in.
"""
