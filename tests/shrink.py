"""Overrides that shrink the micro pipeline (tests/conf/micro.yaml) for tests that run the whole DAG and check
what flows between its stages rather than what the stages learn: a tenth of the data, a step or two a stage."""

# a step or two a stage, on the micro data as it is
SHRINK_STEPS = [
    "pretrain.phases=[{data: pretrain_broad, steps: 2, lr_start: 1.0e-3, lr_end: 1.0e-3}]",
    "sft.phases=[{data: sft_stage1, steps: 2, lr_start: 1.0e-3, lr_end: 1.0e-3}]",
    "rlvr.iterations=1", "rlhf.iterations=1", "rlhf.genrm_steps=1", "rlhf.genrm_heldout_pairs=2", "eval.per_family=1",
]
# and a tenth of the data
SHRINK_ALL_BUT_PACORE = [
    "data.sets.pretrain_broad.families={caption: {n: 10}, text: {n: 10}, text_math: {n: 10}, mm_math: {n: 10}, "
    "perception_count: {n: 10}}",
    "data.sets.pretrain_hq.families={text_math: {n: 10}, ocr: {n: 10}}",
    "data.sets.sft_stage1.families={text_math: {n: 20}, chat: {n: 10}, mm_math: {n: 10}}",
    "data.sets.sft_stage2.families={text_math: {n: 10}, mm_math: {n: 10}}",
    "data.sets.rl.families={text_math: {n: 8}, mm_math: {n: 8}}",
    "data.sets.preference.families={preference: {n: 10}}",
    "data.sets.eval.families={text_math: {n: 2}, mm_math: {n: 2}, perception_count: {n: 2}, chat: {n: 2}}",
    *SHRINK_STEPS,
]
# and PaCoRe's curriculum down to one step
SHRINK = [*SHRINK_ALL_BUT_PACORE, "pacore.curriculum=[{prompts: 2, width: 2, sft_steps: 0, rl_iterations: 1}]"]
