"""Sagas (alias module): the code lives in `rsaga.process.saga`."""

from rsaga.process.saga import (
    SAGA_EVENTS,
    Action,
    CompensationAttemptFailed,
    CompensationStarted,
    Saga,
    SagaCompensated,
    SagaCompensationFailed,
    SagaCompleted,
    SagaProgress,
    Step,
    StepCompensated,
    StepFailed,
    StepStarted,
    StepSucceeded,
)

__all__ = [
    "SAGA_EVENTS",
    "Action",
    "CompensationAttemptFailed",
    "CompensationStarted",
    "Saga",
    "SagaCompensated",
    "SagaCompensationFailed",
    "SagaCompleted",
    "SagaProgress",
    "Step",
    "StepCompensated",
    "StepFailed",
    "StepStarted",
    "StepSucceeded",
]
