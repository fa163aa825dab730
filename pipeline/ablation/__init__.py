"""PAPER §8's ablation as configurations of the one pipeline (`rows`), each row's result read
back from its stage outputs (`results`), the table and claims (`report`) and the report folder
(`writeup`)."""
