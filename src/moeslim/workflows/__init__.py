"""Workflows: the commands' orchestration, built on the layers below.

``stages`` (plan + apply one method), ``recipe`` (a YAML/JSON run description), ``variants`` (build and
evaluate compressed variants side by side), ``run_folder`` (a run's plans, checkpoint, results, report),
``demo`` (the main job on the embedded model), ``expert_load`` (``moeslim inspect``), ``streamed_apply``
(``apply --stream``). Nothing below ``workflows`` imports it.
"""
