"""Side-by-side benchmark of funcnodes_tw and the reference worker; see bench/README.md."""
