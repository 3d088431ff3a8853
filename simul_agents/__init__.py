"""simul_agents: SimulEval agents, scoring and sweeps for proactive streaming LLMs.

Importing this package is light (no simuleval, no torch); the helpers import what they need when called.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def evaluate_inprocess(agent_class, argv: Sequence[str]) -> None:
    """Run SimulEval in this process: ``simuleval.cli.evaluate(agent_class)`` with ``argv`` as its command line.

    SimulEval reads ``sys.argv`` and keeps a global list of entrypoint classes (importing an agent file with
    ``@entrypoint`` adds to it, and more than one entry makes it demand ``--agent-class``): both are set for the
    call and restored after it, so repeated runs in one process (tests, sweeps) do not see each other.
    """
    from simuleval import cli
    from simuleval.utils.agent import EVALUATION_SYSTEM_LIST

    saved_argv, saved_systems = sys.argv, list(EVALUATION_SYSTEM_LIST)
    sys.argv = ["simuleval", *map(str, argv)]
    EVALUATION_SYSTEM_LIST.clear()
    try:
        cli.evaluate(agent_class, {})
    finally:
        sys.argv = saved_argv
        EVALUATION_SYSTEM_LIST[:] = saved_systems
