from services.prefill.server import main

raise SystemExit(main())
