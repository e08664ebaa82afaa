"""`python -m mm_moe.upcycle`: see mm_moe/upcycle/__init__.py."""

from mm_moe.upcycle.command import main

main()
