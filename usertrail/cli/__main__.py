"""python -m usertrail.cli"""

from usertrail.cli import main

raise SystemExit(main())
