"""The reliability and security suite's catalogue: every fault the platform promises to survive.

One :class:`Case` per fault: what is injected, what must happen, and the tests (pytest node ids,
new ones under ``tests/reliability/`` or existing ones elsewhere) that prove it. RELIABILITY.md is
rendered from this list plus the outcomes the tests measured (``scripts/reliability_report.py``);
``test_reliability_report.py`` fails when the two disagree, so neither can go stale silently.
"""

from __future__ import annotations

from dataclasses import dataclass

R = "tests/reliability/"


@dataclass(frozen=True)
class Case:
    id: str
    area: str
    fault: str
    injection: str
    expected: str
    tests: tuple[str, ...]


CASES: tuple[Case, ...] = (
    # ------------------------------------------------------------------ crashes during training
    Case("sigkill-pretrain", "crash", "SIGKILL during pre-training",
         "`step3vl stage pretrain` killed after a random 1-8 of its 10 checkpoints (3 seeded trials)",
         "rerun resumes from the last checkpoint; final weights bit-identical to an uninterrupted run",
         ("tests/test_train.py::test_sigkill_and_resume_is_bit_identical",)),
    Case("sigkill-sft", "crash", "SIGKILL during SFT",
         "`step3vl stage sft` killed after a random 1-3 of its 4 checkpoints (seeded)",
         "rerun resumes from the last checkpoint; final weights bit-identical to an uninterrupted run",
         (R + "test_reliability_sigkill.py::test_sft_sigkill_and_resume_is_bit_identical",)),
    Case("sigkill-rlvr", "crash", "SIGKILL during RLVR",
         "`step3vl stage rlvr` killed after 1 and after 3 of 5 iterations",
         "rerun resumes; final policy bit-identical to an uninterrupted run",
         ("tests/test_rl_resume.py::test_rlvr_sigkill_and_resume_is_bit_identical",)),
    Case("sigkill-rlhf", "crash", "SIGKILL during RLHF (GenRM training or RL)",
         "`step3vl stage rlhf` killed at a seeded random point: after GenRM step 1, or after RL iteration 1 or 2",
         "rerun reuses the finished judge / resumes the policy; final policy bit-identical to an uninterrupted run",
         (R + "test_reliability_sigkill.py::test_rlhf_sigkill_and_resume_is_bit_identical",)),
    Case("sigkill-pacore", "crash", "SIGKILL during PaCoRe training",
         "`step3vl stage pacore` killed after step 1's message set, mid warm-up, and after step 1",
         "rerun resumes; final policy bit-identical to an uninterrupted run",
         ("tests/test_rl_resume.py::test_pacore_sigkill_and_resume_is_bit_identical",)),
    Case("sigkill-pipeline", "crash", "SIGKILL of a whole pipeline run",
         "`step3vl run` (micro) process group killed right after SFT's first checkpoint",
         "rerun: data prep and pretrain cache hits, SFT resumes at its checkpoint, all stages done",
         ("tests/test_pipeline.py::test_run_killed_resumes_then_reruns_all_cached_then_from_stage",)),
    Case("crash-mid-publish", "crash", "Crash in the middle of publishing (dataset, checkpoint, model)",
         "an exception raised while the second file of a published directory is copied into place",
         "no MANIFEST.json at the destination, nothing visible to readers, the previous checkpoint is the latest",
         (R + "test_reliability_safeguards.py::test_crash_mid_publish_leaves_nothing_visible",
          "tests/test_storage.py::test_failed_publish_leaves_nothing")),
    # ------------------------------------------------------------------ storage
    Case("s3-down-mid-upload", "storage", "S3 server stopped mid-upload",
         "the radosgw gateway killed between two object uploads of a checkpoint publish (retry budget 8 s)",
         "bounded retries then a StorageError naming the endpoint; no partial checkpoint visible; "
         "after the gateway restarts the same publish completes",
         (R + "test_reliability_s3.py::test_gateway_stopped_mid_upload_then_restarted",
          "tests/test_s3_integration.py::test_server_down_fails_within_bounded_time",
          "tests/test_s3_integration.py::test_reader_sees_nothing_until_manifest",
          "tests/test_s3_integration.py::test_interrupted_publish_is_invisible_and_recoverable")),
    Case("corrupt-checkpoint", "storage", "Bit flip / truncation in the newest checkpoint",
         "one byte of model.safetensors flipped (same size) or the file truncated",
         "refused naming the file; resume falls back to the previous valid checkpoint",
         ("tests/test_checkpoint.py::test_latest_valid_checkpoint_skips_corrupt_newest",
          "tests/test_checkpoint.py::test_truncated_weights_are_refused_naming_the_file",
          "tests/test_s3_integration.py::test_corrupt_object_is_refused_and_skipped",
          R + "test_reliability_safeguards.py::test_cases_hold_with_every_safeguard")),
    Case("disk-full", "storage", "Disk full during a checkpoint write",
         "checkpoints on a real 8 MiB tmpfs, filled so the next checkpoint runs out of space while writing the weights, the training state, or the manifest",
         "the write fails with ENOSPC; the previous checkpoint stays the latest valid one and loads; "
         "no temporary leftovers; after space is freed the same step saves",
         (R + "test_reliability_disk.py::test_disk_full_during_checkpoint_keeps_previous_valid",)),
    # ------------------------------------------------------------------ tracking
    Case("mlflow-preflight", "tracking", "MLflow tracking server unreachable at start",
         "`step3vl run` / `tracking.preflight` against a closed port and a port that accepts but never answers",
         "fails within the timeout with an error naming the URI (credentials masked); no pipeline work starts",
         (R + "test_reliability_mlflow.py::test_preflight_fails_fast_naming_the_uri",
          R + "test_reliability_mlflow.py::test_run_refuses_to_start_without_tracking")),
    Case("mlflow-lost-mid-stage", "tracking", "MLflow tracking server dies mid-stage",
         "`mlflow server` (SQLite backend) killed after the first checkpoint of `step3vl stage pretrain`: "
         "(a) restarted on the same port two checkpoints later, (b) kept down until the stage ends",
         "training continues and checkpoints are kept; (a) the journaled metrics are sent when the server "
         "returns and the run ends FINISHED; (b) the stage fails naming the server and its journal, and a "
         "replay sends every point and marks the run FAILED: never a silent loss",
         (R + "test_reliability_mlflow.py::test_tracking_server_lost_mid_stage",
          "tests/test_tracking_sink.py::test_server_lost_then_back_mid_stage_loses_nothing_and_never_blocks",
          "tests/test_tracking_sink.py::test_replay_sends_only_what_was_never_acknowledged_and_marks_the_run_failed")),
    Case("mlflow-refuses-mid-stage", "tracking", "MLflow answers a stage's records with an error no retry fixes",
         "the stage's run deleted mid-stage (SQLite store); a metric value the store rejects (one batch of three)",
         "the refused records are set aside at once and the rest still sent; the stage fails within seconds "
         "(not after its flush timeout) naming the run, the store's error and the journal the refused records "
         "are kept in, which replay leaves alone",
         ("tests/test_tracking_sink.py::test_stage_whose_run_is_deleted_mid_stage_fails_at_once_naming_it",
          "tests/test_tracking_sink.py::test_records_the_store_refuses_are_set_aside_at_once_and_the_rest_still_go")),
    # ------------------------------------------------------------------ data
    Case("bad-data-gate", "data", "Bad records: every failure class of the data gate",
         "missing/undecodable images, tag count mismatch, duplicate ids, empty turns, missing answers, "
         "non-UTF-8, invalid JSON, schema violations, token length, train/eval leakage",
         "each refused with a report naming the check, the rows and the record ids",
         ("tests/test_data_gate.py::test_missing_image_file", "tests/test_data_gate.py::test_undecodable_image",
          "tests/test_data_gate.py::test_image_tag_count_mismatch",
          "tests/test_data_gate.py::test_duplicate_id_across_shards",
          "tests/test_data_gate.py::test_empty_assistant_turn",
          "tests/test_data_gate.py::test_missing_answer_when_required",
          "tests/test_data_gate.py::test_non_utf8_bytes_in_shard", "tests/test_data_gate.py::test_invalid_json",
          "tests/test_data_gate.py::test_schema_violation", "tests/test_data_gate.py::test_token_length_over_the_limit",
          "tests/test_data_gate.py::test_train_eval_leakage")),
    Case("bad-data-hostile", "data", "Hostile records: path traversal, bombs, huge lines, duplicate keys",
         "`../../etc/passwd`, `/etc/passwd`, `file://` and Windows paths, a symlink out of the dataset, a 30000x30000 "
         "PNG bomb, a 10 MB line, JSON with duplicate keys",
         "refused with a clear report; the 10 MB line is never read whole; no image outside the dataset is opened",
         ("tests/test_data_gate.py::test_unsafe_image_paths", "tests/test_data_gate.py::test_symlink_escaping_the_dataset",
          "tests/test_data_gate.py::test_decompression_bomb_png",
          "tests/test_data_gate.py::test_ten_megabyte_line_is_refused_without_reading_it_whole",
          "tests/test_data_gate.py::test_duplicate_json_keys",
          R + "test_reliability_safeguards.py::test_cases_hold_with_every_safeguard")),
    Case("bad-data-downstream", "data", "Bad user dataset fed to data prep",
         "a user SFT set holding a traversal ref, a pixel bomb, a 10 MB line and duplicate keys",
         "data prep raises GateFailed with every check named; no packed data, nothing for training to consume",
         (R + "test_reliability_data.py::test_bad_user_dataset_stops_data_prep_before_anything_is_packed",)),
    # ------------------------------------------------------------------ untrusted artifacts
    Case("pickle-checkpoint", "security", "Checkpoint carrying a pickle payload",
         "a `.bin`/`.pt` pickle planted in a checkpoint; a pickle written under the name model.safetensors "
         "with a re-signed manifest",
         "refused before anything is unpickled; the payload never runs",
         ("tests/test_checkpoint.py::test_planted_pickle_file_is_refused",
          "tests/test_checkpoint.py::test_loading_never_unpickles",
          R + "test_reliability_data.py::test_pickle_disguised_as_safetensors_never_runs")),
    Case("secrets", "security", "Secrets in the environment",
         "planted AWS/MLflow/API keys in the environment of a whole `step3vl run`",
         "the values appear in no MLflow param, tag, metric key or artifact, no KFP output, no log, no stdout",
         (R + "test_reliability_pipeline.py::test_concurrent_runs_and_planted_secrets",
          "tests/test_tracking.py::test_redact_secret_keys")),
    # ------------------------------------------------------------------ serving
    Case("serve-bad-requests", "serving", "Malformed and out-of-limit requests",
         "broken JSON, wrong types, n / max_tokens over limits, oversized bodies and images, pixel bombs, "
         "schemathesis-generated invalid requests",
         "4xx in the OpenAI error shape, never a 5xx",
         (R + "test_reliability_serve.py::test_malformed_json_and_wrong_types_are_4xx",
          "tests/test_serve.py::test_bad_requests_are_400_in_the_openai_shape",
          "tests/test_serve.py::test_oversized_bodies_and_images_are_413",
          "tests/test_serve.py::test_openapi_spec_property_based_run_finds_no_5xx")),
    Case("serve-slow-clients", "serving", "Slow clients (slowloris)",
         "40 connections that send headers and half a body, then stall",
         "other clients are served meanwhile; the server stays healthy and answers after they go",
         (R + "test_reliability_serve.py::test_slow_clients_do_not_block_others",)),
    Case("serve-overload", "serving", "400 concurrent requests",
         "400 clients at once against a queue of 128",
         "each gets 200 or 429 (queue_full), never a 5xx or a dropped connection; RSS growth bounded; "
         "the server answers afterwards",
         (R + "test_reliability_serve.py::test_400_concurrent_requests_are_200_or_429",
          "tests/test_serve.py::test_a_full_queue_is_429")),
    # ------------------------------------------------------------------ concurrency
    Case("concurrent-pipelines", "concurrency", "Two pipeline runs at once on the same MLflow and storage",
         "two `step3vl run` (micro, shrunk) started together with the same STEP3VL_HOME (SQLite MLflow, "
         "artifact store, KFP root, cache)",
         "both train and evaluate (a training stage holds a lock on its checkpoint root, so the second run waits "
         "and resumes from the first's checkpoints, and may take later stages from the cache); at most one loses "
         "the race for the champion alias and fails loudly (PromotionConflict) instead of overwriting it; each "
         "parent run keeps its own outputs record; every model output and registered version verifies; each "
         "alias names a registered version",
         (R + "test_reliability_pipeline.py::test_concurrent_runs_and_planted_secrets",
          R + "test_reliability_mlflow.py::test_two_runs_starting_on_a_fresh_store_both_open_it",
          "tests/test_registry.py::test_racing_promotions_end_with_one_champion_and_the_loser_told_why")),
)

# The safeguards whose removal must make at least one case fail (proved in test_reliability_safeguards.py).
SAFEGUARDS: dict[str, str] = {
    "atomic publish": R + "test_reliability_safeguards.py::test_without_atomic_publish_a_partial_checkpoint_is_visible",
    "checksum check": R + "test_reliability_safeguards.py::test_without_checksums_a_corrupt_checkpoint_is_resumed",
    "path check": R + "test_reliability_safeguards.py::test_without_the_path_check_an_outside_image_is_read",
    "size limit (line)": R + "test_reliability_safeguards.py::test_without_the_line_limit_a_huge_line_is_read_whole",
    "size limit (pixels)": R + "test_reliability_safeguards.py::test_without_the_pixel_limit_a_bomb_is_decoded",
}


def all_node_ids() -> list[str]:
    """Every test the catalogue names, in order, without repeats."""
    seen: dict[str, None] = {}
    for case in CASES:
        for t in case.tests:
            seen.setdefault(t, None)
    for t in SAFEGUARDS.values():
        seen.setdefault(t, None)
    return list(seen)
