"""Corpora and manifests: the offline Ding corpus, MuST-C, CoVoST 2 and a user's TSV, all to one manifest.

``python -m training.corpus --help`` lists the commands. The manifest format is in ``manifest.py``.
"""

from .check import CheckReport, check_manifest
from .covost import read_covost
from .ding import DingFilter, SentencePair, read_ding
from .errors import BadInput, CorpusError
from .manifest import MANIFEST_COLUMNS, SPLITS, Row, read_manifest, write_manifest
from .mustc import read_mustc
from .offline import BuildReport, build_offline_corpus
from .simuleval_files import write_simuleval_files
from .splits import SplitShares
from .user_tsv import read_user_tsv

__all__ = [
    "MANIFEST_COLUMNS",
    "SPLITS",
    "BadInput",
    "BuildReport",
    "CheckReport",
    "CorpusError",
    "DingFilter",
    "Row",
    "SentencePair",
    "SplitShares",
    "build_offline_corpus",
    "check_manifest",
    "read_covost",
    "read_ding",
    "read_manifest",
    "read_mustc",
    "read_user_tsv",
    "write_manifest",
    "write_simuleval_files",
]
