from tierstore.cli import main

raise SystemExit(main())
