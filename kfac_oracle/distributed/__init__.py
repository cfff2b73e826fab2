"""Data-parallel conformance: a candidate computing its factors over W processes.

``kfac-oracle check IMPL --world-size W`` starts one ``torch.distributed`` group of
``W`` processes for the whole run (:mod:`~kfac_oracle.distributed.group`), gives every
rank the same model and its own shard of each case's data
(:mod:`~kfac_oracle.distributed.shards`), collects every rank's result
(:mod:`~kfac_oracle.distributed.caller`) and runs the distributed checks
(:mod:`~kfac_oracle.distributed.checks`, diagnosed by
:mod:`~kfac_oracle.distributed.diagnose`; the run loop is
:mod:`~kfac_oracle.distributed.run`). The reference in data-parallel form is
:mod:`~kfac_oracle.distributed.reference`.
"""
