"""chrF as a SimulEval quality metric: load it with ``--user-dir simul_agents/chrf_scorer``.

    simuleval --user-dir simul_agents/chrf_scorer --quality-metrics BLEU CHRF ...

SimulEval imports ``--user-dir`` as a module named by the last path component (so no ``.py``), before it
parses the metrics; a scorer registered inside the ``--agent`` file is seen too late. Registers ``CHRF``
(sacrebleu's chrF: character 6-grams, beta 2; ``--chrf-word-order 2`` gives chrF++).
"""

from __future__ import annotations

from sacrebleu.metrics import CHRF
from simuleval.evaluator.scorers.quality_scorer import QualityScorer, register_quality_scorer


@register_quality_scorer("CHRF")
class CHRFScorer(QualityScorer):
    """Corpus chrF of the predictions against the references (sacrebleu)."""

    def __init__(self, word_order: int = 0) -> None:
        super().__init__()
        self.word_order = word_order

    def __call__(self, instances: dict) -> float:
        predictions = [ins.prediction for ins in instances.values()]
        references = [ins.reference for ins in instances.values()]
        return CHRF(word_order=self.word_order).corpus_score(predictions, [references]).score

    @staticmethod
    def add_args(parser) -> None:
        parser.add_argument("--chrf-word-order", type=int, default=0, help="chrF word n-gram order (2: chrF++)")

    @classmethod
    def from_args(cls, args) -> CHRFScorer:
        return cls(args.chrf_word_order)
