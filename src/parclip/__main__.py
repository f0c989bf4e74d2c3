from parclip.cli import main

raise SystemExit(main())
