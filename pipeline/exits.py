"""The commands' exit statuses (the CLI's contract): one place, without torch or Ray, for the CLI and the run."""

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1  # verify: the release does not hold what it claims (its problems are printed)
EXIT_BAD_ARGS = 2  # bad arguments or input, refused before any work, or a location a rerun cannot mend
EXIT_INCOMPLETE = 3  # the run stopped before the release was complete: rerun the same command to resume
EXIT_UNPROTECTED = 4  # the release is complete but the protection probe (or its battery) does not hold
