"""Recipe levers measured one at a time: each lever is a params.yaml override, trained on the
images of the last ``dvc repro`` as its own MLflow run, scored on validation (which also
chooses the threshold) and test with bootstrap CIs, and compared with the baseline by a
paired bootstrap on the same test images. Every lever is also scored with test-time
augmentation, which needs no training of its own. A study with ``seeds`` trains every lever
once per seed, so a lever's effect can be told from training noise: it adds each lever's
mean over seeds and the ensemble of its seeds.

A lever's row is reproduced in the full pipeline by ``dvc exp run -S key=value ...``.

Modules: ``study`` (the YAML study and its runs), ``runner`` (train or reuse each run),
``statistics`` (scores, paired differences, seed tables), ``report`` (the Markdown table);
``segmenter_budget`` does the same for the lung and lesion nets' epoch budgets.
"""
