"""The test domain: bank accounts as event streams, and commands over them.

Every account is one stream. Its events are a tagged `msgspec.Struct` family
(`Opened`, `Deposited`, `Withdrawn`); the commands are the executor's test
subjects: `Transfer` reads and writes two streams, `Withdraw` may read a
guarantor's stream without writing to it, and `ChargeFee` discovers the fee
account from the state (`more_streams`).

The module also holds a few helpers that look at Redis directly, so tests can
assert on what is stored rather than on what the store says it stored.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
from redis.asyncio import Redis

from rsaga import Command, DomainError, RecordedEvent, StreamId, Writes
from rsaga.store import EventStore, LogEntry

# --- events -------------------------------------------------------------------------


class Opened(msgspec.Struct, frozen=True, tag="bank.opened"):
    owner: str
    fee_account: str | None = None


class Deposited(msgspec.Struct, frozen=True, tag="bank.deposited"):
    amount: int


class Withdrawn(msgspec.Struct, frozen=True, tag="bank.withdrawn"):
    amount: int


AccountEvent = Opened | Deposited | Withdrawn
BANK_EVENTS = (Opened, Deposited, Withdrawn)


class Note(msgspec.Struct, frozen=True):
    """An untagged event (type name = class name); registered only where a test says so."""

    text: str


# --- state --------------------------------------------------------------------------


class InsufficientFunds(DomainError):
    """The account cannot cover the amount."""


class Account(msgspec.Struct):
    opened: bool = False
    balance: int = 0
    fee_account: str | None = None


Ledger = dict[str, Account]


def fold(ledger: Ledger, event: RecordedEvent) -> Ledger:
    """Apply one recorded bank event to the ledger of the streams it has seen."""
    account = ledger.setdefault(event.stream_id, Account())
    match event.data:
        case Opened(fee_account=fee_account):
            account.opened = True
            account.fee_account = fee_account
        case Deposited(amount=amount):
            account.balance += amount
        case Withdrawn(amount=amount):
            account.balance -= amount
        case other:
            raise TypeError(f"not a bank event: {other!r}")
    return ledger


def balance(events: Iterable[RecordedEvent]) -> int:
    """The balance after `events` (of one account)."""
    total = 0
    for event in events:
        if isinstance(event.data, Deposited):
            total += event.data.amount
        elif isinstance(event.data, Withdrawn):
            total -= event.data.amount
    return total


# --- commands -----------------------------------------------------------------------


class BankCommand(Command[Ledger], frozen=True, kw_only=True):
    def initial_state(self) -> Ledger:
        return {}

    def apply(self, state: Ledger, event: RecordedEvent) -> Ledger:
        return fold(state, event)


def _open(state: Ledger, account: str) -> Account:
    found = state.get(account)
    if found is None or not found.opened:
        raise DomainError(f"account {account!r} is not open")
    return found


class OpenAccount(BankCommand, frozen=True, kw_only=True):
    account: StreamId
    owner: str
    initial: int = 0
    fee_account: str | None = None

    def handle(self, state: Ledger) -> Writes:
        if self.account in state and state[self.account].opened:
            raise DomainError(f"account {self.account!r} is already open")
        events: list[msgspec.Struct] = [Opened(self.owner, self.fee_account)]
        if self.initial:
            events.append(Deposited(self.initial))
        return {self.account: events}


class Deposit(BankCommand, frozen=True, kw_only=True):
    account: StreamId
    amount: int

    def handle(self, state: Ledger) -> Writes:
        _open(state, self.account)
        return {self.account: [Deposited(self.amount)]}


class Withdraw(BankCommand, frozen=True, kw_only=True):
    """Withdraw; a guarantor's balance covers an overdraft (read, never written)."""

    account: StreamId
    amount: int
    guarantor: StreamId | None = None

    def handle(self, state: Ledger) -> Writes:
        available = _open(state, self.account).balance
        if self.guarantor is not None:
            available += _open(state, self.guarantor).balance
        if self.amount > available:
            raise InsufficientFunds(f"{self.account} cannot cover {self.amount}")
        return {self.account: [Withdrawn(self.amount)]}


class Transfer(BankCommand, frozen=True, kw_only=True):
    """Move `amount` from `source` to `target`; refuses overdrafts."""

    source: StreamId
    target: StreamId
    amount: int

    def handle(self, state: Ledger) -> Writes:
        if self.amount <= 0:
            raise DomainError(f"amount must be positive, got {self.amount}")
        if self.source == self.target:
            raise DomainError("cannot transfer to the same account")
        source = _open(state, self.source)
        _open(state, self.target)
        if source.balance < self.amount:
            raise InsufficientFunds(
                f"{self.source} has {source.balance}, cannot send {self.amount}"
            )
        return {self.source: [Withdrawn(self.amount)], self.target: [Deposited(self.amount)]}


class ChargeFee(BankCommand, frozen=True, kw_only=True):
    """Move a fee to the account's fee account, which only the state names."""

    account: StreamId
    fee: int

    def more_streams(self, state: Ledger) -> list[str]:
        found = state.get(self.account)
        return [found.fee_account] if found and found.fee_account else []

    def handle(self, state: Ledger) -> Writes:
        account = _open(state, self.account)
        if account.fee_account is None:
            raise DomainError(f"{self.account} has no fee account")
        _open(state, account.fee_account)
        if account.balance < self.fee:
            raise InsufficientFunds(f"{self.account} cannot pay a fee of {self.fee}")
        return {self.account: [Withdrawn(self.fee)], account.fee_account: [Deposited(self.fee)]}


# --- looking at Redis directly ------------------------------------------------------


async def keys_under(redis: Redis, prefix: str) -> list[bytes]:
    """Every key of data whose name starts with ``<prefix>:`` (sorted), on every master of
    a cluster; the shard count the first commit stores (``<prefix>:shards``) left out."""
    found = [key async for key in redis.scan_iter(match=f"{prefix}:*", count=1000)]
    return sorted(key for key in found if key != f"{prefix}:shards".encode())


async def raw_entries(redis: Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XRANGE of the whole stream at `key`, as stored."""
    entries = await redis.xrange(key, "-", "+")
    return [(entry_id, dict(fields)) for entry_id, fields in entries]


async def snapshot(redis: Redis, keys: Iterable[str]) -> dict[str, list[object]]:
    """XRANGE of each key, to compare before and after a refused write."""
    return {key: await raw_entries(redis, key) for key in keys}


async def whole_log(store: EventStore, shard: int = 0, page: int = 50) -> list[LogEntry]:
    """Every entry of a shard log, read in pages of `page`."""
    entries: list[LogEntry] = []
    after = "0-0"
    while True:
        batch = await store.read_log(shard, after=after, count=page)
        if not batch:
            return entries
        entries.extend(batch)
        after = batch[-1].log_id
