"""``cen bench``: the timing protocol (:mod:`~cenfusion.bench.timing`), the networks and steps
it times (:mod:`~cenfusion.bench.cases`), the per-modality reference it compares with
(:mod:`~cenfusion.bench.reference`), the command (:mod:`~cenfusion.bench.command`)."""
