"""Bank accounts: the smallest example of a multi-stream command.

Each account is a stream (``account-<n>``). `Transfer` reads both accounts,
refuses an overdraft, and writes one event to each, atomically: either both
streams change or neither does.
"""

from __future__ import annotations

import msgspec

from rsaga import Command, DomainError, RecordedEvent, StreamId, Writes


class AccountEvent(msgspec.Struct, frozen=True, tag=True):
    """The event family of an account."""


class Opened(AccountEvent, frozen=True):
    """The account exists."""

    owner: str


class Deposited(AccountEvent, frozen=True):
    """Money came in."""

    amount: int


class Withdrawn(AccountEvent, frozen=True):
    """Money went out."""

    amount: int


ACCOUNT_EVENTS = (Opened, Deposited, Withdrawn)


class InsufficientFunds(DomainError):
    """The source account cannot cover the transfer."""


class Balances(msgspec.Struct):
    """Balance per account stream, and which accounts are open."""

    balance: dict[str, int] = msgspec.field(default_factory=dict)
    open: set[str] = msgspec.field(default_factory=set)


class Transfer(Command[Balances], frozen=True, tag="bank.transfer"):
    """Move `amount` from `source` to `target`; both must be open."""

    source: StreamId
    target: StreamId
    amount: int

    def initial_state(self) -> Balances:
        """No accounts known yet."""
        return Balances()

    def apply(self, state: Balances, event: RecordedEvent) -> Balances:
        """Fold one account event."""
        account = event.stream_id
        match event.data:
            case Opened():
                state.open.add(account)
            case Deposited(amount=amount):
                state.balance[account] = state.balance.get(account, 0) + amount
            case Withdrawn(amount=amount):
                state.balance[account] = state.balance.get(account, 0) - amount
        return state

    def handle(self, state: Balances) -> Writes:
        """Refuse unknown accounts and overdrafts, else withdraw and deposit."""
        for account in (self.source, self.target):
            if account not in state.open:
                raise DomainError(f"account {account} is not open")
        if self.amount <= 0:
            raise DomainError("amount must be positive")
        if state.balance.get(self.source, 0) < self.amount:
            raise InsufficientFunds(f"{self.source} cannot cover {self.amount}")
        return {
            self.source: [Withdrawn(amount=self.amount)],
            self.target: [Deposited(amount=self.amount)],
        }
