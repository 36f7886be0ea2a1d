SamePortMain.main()
