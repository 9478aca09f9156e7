"""The bundled lm-eval tasks (YAML + `custom_dataset` code), shipped in the wheel as `lm_eval_retrieval.tasks`.

In a source checkout this folder is `tasks/` at the repository root (`--include_path tasks/`); setup.cfg maps the
package `lm_eval_retrieval.tasks` onto it, so after `pip install .` it sits inside the installed package, where
`lm-eval-retrieval tasks-dir` finds it. lm-eval imports `lmr_niah.py` and `lmr_ppl.py` by file path (`!function`).
"""
