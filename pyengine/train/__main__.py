from pyengine.cli.train_digits import main

raise SystemExit(main())
