"""Running a sweep's workers where its users' GPUs are: SLURM job arrays through submitit.

`slurm` holds the launch settings (checked before anything is submitted) and their submitit executor, `jobs`
the requeue-on-preemption job that runs a worker function by reference, `queue` reads job states from `squeue`
(clusters often run without the accounting database that `sacct` needs), `weights` checks on the login node
that every candidate's pretrained weights are there for compute nodes without internet.
"""
