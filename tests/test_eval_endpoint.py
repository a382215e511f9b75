"""`rcllm eval --endpoint`: the eval's request stream against a running cluster (2 nodes and a
coordinator on loopback, tiny random llama), the JSON contract with latency and throughput,
rankings identical to the in-process engine's, and clear errors for what cannot work."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from rcllm.build.pipeline import BuildOptions, build_cache
from rcllm.cli.main import app
from rcllm.data.loaders import load_dataset, prepare
from rcllm.data.synthetic import make_synthetic
from rcllm.engine.ranker import Ranking
from rcllm.eval.endpoint import EndpointError, endpoint_systems, run_endpoint_eval
from rcllm.eval.runner import EvalSettings, assemble_result, run_eval, sample_eval_requests
from rcllm.serve.cluster import LocalCluster, free_port
from rcllm.serve.runner import open_cache_ranker
from rcllm.store import Manifest

TOKEN = "eval-token"
HISTORY = 5  # the cache's history blocks and the eval's requests: 5 most recent items
SETTINGS = EvalSettings(users=8, requests_per_user=2, candidates=20, history=HISTORY, seed=3)
SYSTEMS = "full,rcllm:full,rcllm:none"
SYSTEM_KEYS = {"ttft_ms", "hr@1", "hr@5", "hr@10", "ndcg@10", "mrr", "hit_ratio", "recomputed_fraction",
               "latency_ms", "throughput_rps", "errors"}
TOP_KEYS = {"dataset", "model", "device", "n_users", "n_requests", "candidates", "seed", "systems", "baselines",
            "endpoint", "concurrency"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-endpoint-data")
    written = prepare(make_synthetic(n_items=120, n_users=30, seed=0), folder)
    files = {name.split(".")[0]: path for name, path in written.items()}  # catalog, interactions, histories
    return SimpleNamespace(folder=folder, dataset=load_dataset(str(folder)), **files)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, data, tiny_models):
    """A 2-node cache of the tiny llama built from the dataset's catalog, nodes on free loopback ports."""
    out = tmp_path_factory.mktemp("eval-endpoint-cache") / "cache"
    options = BuildOptions(out=out, nodes=2, model=str(tiny_models["llama"]), users=data.histories,
                           interactions=data.interactions, history=HISTORY, embedder="llm")
    build_cache(data.catalog, options)
    manifest = Manifest.load(out)
    manifest.nodes = [{"node": k, "host": "127.0.0.1", "port": free_port()} for k in range(2)]
    manifest.save(out)  # the nodes find their peers here
    return out


@pytest.fixture(scope="module")
def cluster(cache, tmp_path_factory):
    logs = tmp_path_factory.mktemp("eval-endpoint-logs")
    with LocalCluster(cache, logs, nodes=2, node_ports=[n["port"] for n in Manifest.load(cache).nodes], token=TOKEN,
                      env={"OMP_NUM_THREADS": "1"}, node_args=("--threads", "1")) as c:
        c.start()
        yield c


@pytest.fixture(scope="module")
def result(cluster, data):
    return run_endpoint_eval(cluster.url, data.dataset, SYSTEMS, SETTINGS, concurrency=4, token=TOKEN, timeout_s=60)


def test_endpoint_result_follows_the_json_contract_with_latency_and_throughput(result, cluster):
    assert TOP_KEYS <= set(result)
    assert result["endpoint"] == cluster.url and result["concurrency"] == 4
    assert set(result["systems"]) == {"full", "rcllm:full", "rcllm:none"}
    n = result["n_requests"]
    assert n == 16 and result["n_users"] == 8
    for name, s in result["systems"].items():
        assert SYSTEM_KEYS <= set(s), name
        assert set(s["ttft_ms"]) == set(s["latency_ms"]) == {"mean", "p50", "p90", "p99"}
        assert set(s["hit_ratio"]) == {"user", "item"}
        assert ("fidelity" in s) == (name != "full")
        assert s["errors"] == 0 and s["requests"] == n
        assert s["throughput_rps"] > 0 and s["latency_ms"]["mean"] > 0 and s["ttft_ms"]["mean"] > 0
        assert s["latency_ms"]["p99"] >= s["latency_ms"]["p50"] > 0
        assert sum(s["nodes"].values()) == n
    # the client waits at least what the server spent ranking
    assert result["systems"]["full"]["latency_ms"]["mean"] >= result["systems"]["full"]["ttft_ms"]["mean"]
    assert result["systems"]["full"]["recomputed_fraction"] == 1.0
    assert result["systems"]["rcllm:none"]["recomputed_fraction"] < 0.5
    assert set(result["baselines"]) == {"random", "popularity"}
    json.dumps(result)


def test_rcllm_full_over_http_reproduces_full(result):
    f = result["systems"]["rcllm:full"]["fidelity"]
    assert f["top1_agree"] == 1.0 and f["kendall_tau"] == pytest.approx(1.0) and f["hr@10_delta"] == 0.0


def test_endpoint_full_ranks_exactly_like_the_in_process_full(result, cache, data):
    ranker = open_cache_ranker(Manifest.load(cache))  # the model, dtype and template the nodes run
    requests = sample_eval_requests(data.dataset, SETTINGS)
    local = run_eval(ranker, data.dataset, "full", SETTINGS, lambda: None, "tiny", requests=requests)
    served, here = result["systems"]["full"], local["systems"]["full"]
    for key in ("hr@1", "hr@5", "hr@10", "ndcg@10", "mrr"):
        assert served[key] == here[key], key
    assert 0.0 < here["hr@10"] < 1.0  # 20 candidates: the check can fail
    assert result["baselines"] == local["baselines"]


def test_a_dataset_the_cache_was_not_built_from_is_refused_clearly(cluster):
    other = make_synthetic(n_items=400, n_users=30, seed=5)  # ids beyond the cache's 120 items
    with pytest.raises(EndpointError, match="the server's cache does not hold item .* was it built from this dataset"):
        run_endpoint_eval(cluster.url, other, "rcllm:none", SETTINGS, concurrency=4, token=TOKEN, timeout_s=60)


def test_a_node_refuses_a_wrong_token_clearly(cluster, data):
    # the coordinator is open; the token guards the nodes, which the eval can also drive one at a time
    with pytest.raises(EndpointError, match="HTTP 401.*--token"):
        run_endpoint_eval(cluster.node_url(0), data.dataset, "full", SETTINGS, concurrency=2, token="wrong",
                          timeout_s=60)


def test_cli_against_the_cluster_writes_json_and_plot_and_skips_prefix(cluster, data, tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    res = CliRunner().invoke(app, [
        "eval", "--dataset", str(data.folder), "--users", "4", "--requests-per-user", "1", "--candidates", "12",
        "--history", str(HISTORY), "--systems", "prefix,rcllm:none", "--endpoint", cluster.url,
        "--concurrency", "2", "--json", str(out), "--plot", str(png),
    ], env={"RCLLM_TOKEN": TOKEN, "COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "prefix skipped" in res.output and "req/s" in res.output
    written = json.loads(out.read_text())
    assert set(written["systems"]) == {"rcllm:none"} and written["systems"]["rcllm:none"]["errors"] == 0
    assert png.stat().st_size > 0


def test_cli_unreachable_endpoint_is_a_clear_error(data):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    res = CliRunner().invoke(app, ["eval", "--dataset", str(data.folder), "--users", "2", "--systems", "full",
                                   "--endpoint", url])
    assert res.exit_code != 0
    assert f"cannot reach {url}" in res.output and "Traceback" not in res.output


def test_cli_endpoint_with_prefix_only_is_a_clear_error(data):
    res = CliRunner().invoke(app, ["eval", "--dataset", str(data.folder), "--systems", "prefix",
                                   "--endpoint", "http://127.0.0.1:9"])
    assert res.exit_code != 0
    assert "no system to run against a server" in res.output and "Traceback" not in res.output
    with pytest.raises(ValueError, match="rcllm:<policy>"):
        endpoint_systems("prefix")
    assert endpoint_systems("full,prefix,rcllm:none")[0] == ["full", "rcllm:none"]


def _ranking(order, scores) -> Ranking:
    return Ranking(order=order, scores=scores, label_logprobs=[], calibration="contextual", policy="full",
                   ttft_ms=1.0, prompt_tokens=10, recomputed_tokens=10, recomputed_fraction=1.0)


def test_assemble_result_leaves_failed_requests_out(data):
    settings = EvalSettings(users=3, requests_per_user=1, candidates=3, history=2, seed=1)
    requests = sample_eval_requests(data.dataset, settings)
    pos = [r.candidates.index(r.positive) for r in requests]
    best = [_ranking([p, *[i for i in range(3) if i != p]], [0.1 + 0.8 * (i == p) for i in range(3)]) for p in pos]
    worst = [_ranking([*[i for i in range(3) if i != p], p], [0.1 + 0.8 * (i != p) for i in range(3)]) for p in pos]
    rankings = {"full": best, "rcllm:none": [None, *worst[1:]]}
    out = assemble_result(data.dataset, requests, settings, ["full", "rcllm:none"], rankings,
                          model_name="m", device="d", calibration="contextual")
    s = out["systems"]["rcllm:none"]
    assert s["requests"] == 2 and s["hr@1"] == 0.0 and s["fidelity"]["top1_agree"] == 0.0
    assert out["systems"]["full"]["requests"] == 3 and out["systems"]["full"]["hr@1"] == 1.0
    with pytest.raises(ValueError, match="no request was answered"):
        assemble_result(data.dataset, requests, settings, ["full"], {"full": [None] * 3},
                        model_name="m", device="d", calibration="contextual")
