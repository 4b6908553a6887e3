"""The bank transfer demo: concurrent transfers that must never lose or make money.

Opens accounts, runs random transfers concurrently (many conflict and retry),
then checks from Redis alone that the total balance is unchanged and that every
account stream's versions run 1..n without a gap.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import anyio
from redis.asyncio import Redis

from handlers.bank import ACCOUNT_EVENTS, Deposited, InsufficientFunds, Opened, Transfer, Withdrawn
from rsaga import EventRegistry, EventStore, Executor, ExpectedVersion, Keyspace
from rsaga.commands import StreamId
from rsaga.events import new_id

OPENING_BALANCE = 1_000


@dataclass
class DemoReport:
    """What the demo did and whether the books balance."""

    accounts: int
    transfers: int
    completed: int = 0
    refused: int = 0
    retries: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    total_before: int = 0
    total_after: int = 0
    gapless: bool = False

    @property
    def ok(self) -> bool:
        """Money was conserved and every stream is gapless."""
        return self.total_before == self.total_after and self.gapless

    def lines(self) -> list[str]:
        """A short, human-readable summary."""
        lat = sorted(self.latencies_ms) or [0.0]
        p50 = lat[len(lat) // 2]
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        rate = self.transfers / self.seconds if self.seconds else 0.0
        return [
            f"{'accounts':<22}{self.accounts:>10}",
            f"{'transfers':<22}{self.transfers:>10}",
            f"{'  completed':<22}{self.completed:>10}",
            f"{'  refused (overdraft)':<22}{self.refused:>10}",
            f"{'  conflict retries':<22}{self.retries:>10}",
            f"{'throughput':<22}{rate:>10.0f} transfers/s",
            f"{'latency p50 / p99':<22}{p50:>10.2f} / {p99:.2f} ms",
            f"{'total before / after':<22}{self.total_before:>10} / {self.total_after}",
            f"{'versions gapless':<22}{'yes' if self.gapless else 'NO':>10}",
            "result: " + ("OK, the books balance" if self.ok else "FAILED"),
        ]


async def run_bank_demo(
    redis: Redis,
    *,
    accounts: int = 20,
    transfers: int = 2_000,
    concurrency: int = 32,
    prefix: str = "rsaga-demo",
    seed: int | None = None,
) -> DemoReport:
    """Run the demo on `redis` under a fresh key prefix and return the report."""
    store = EventStore(
        redis,
        EventRegistry(ACCOUNT_EVENTS),
        keyspace=Keyspace(prefix=f"{prefix}-{new_id()[:12]}"),
    )
    executor = Executor(store)
    names = [StreamId(f"account-{n}") for n in range(accounts)]
    for name in names:
        await store.append(
            name,
            [Opened(owner=name), Deposited(amount=OPENING_BALANCE)],
            expected=ExpectedVersion.NO_STREAM,
        )
    report = DemoReport(accounts, transfers, total_before=OPENING_BALANCE * accounts)
    rng = random.Random(seed)
    work: list[tuple[StreamId, StreamId, int]] = []
    for _ in range(transfers):
        source, target = rng.sample(names, 2)
        work.append((source, target, rng.randint(1, 300)))
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(source: StreamId, target: StreamId, amount: int) -> None:
        async with limiter:
            started = time.perf_counter()
            try:
                result = await executor.execute(
                    Transfer(source=source, target=target, amount=amount)
                )
            except InsufficientFunds:
                report.refused += 1
            else:
                report.completed += 1
                report.retries += result.attempts - 1
            report.latencies_ms.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for source, target, amount in work:
            tg.start_soon(one, source, target, amount)
    report.seconds = time.perf_counter() - started

    slices = await store.read_streams(names)
    total, gapless = 0, True
    for stream in slices.values():
        gapless &= [e.version for e in stream.events] == list(range(1, stream.version + 1))
        for event in stream.events:
            if isinstance(event.data, Deposited):
                total += event.data.amount
            elif isinstance(event.data, Withdrawn):
                total -= event.data.amount
    report.total_after, report.gapless = total, gapless
    return report
