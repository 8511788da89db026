"""What a process runs on: its rank in the process group and the numeric guards agreed over ranks."""
