use super::*;

fn check_err(text: &str, path: &str, needle: &str) {
    let err = SweepSpec::parse(text, SpecFormat::Toml).unwrap_err();
    assert_eq!(err.path, path, "{err}");
    assert!(err.message.contains(needle), "`{}` lacks `{needle}`", err.message);
}

#[test]
fn overrides_set_nested_values_and_refuse_paths_through_values() {
    let text = "name = \"t\"\nfamily = \"dsir\"\n[base]\nsteps = 300\ntrain = { steps = 3000, lr = 0.001 }\n[sweep]\nsearcher = \"grid\"\nparams.width = [64, 128, 256]\n";
    let sets = [
        "base.steps=4".to_string(),
        "base.train.steps=10".to_string(),
        "sweep.params.width=[32]".to_string(),
        "base.data_dir=fashion-mnist".to_string(),
        "resources.fresh_process=true".to_string(),
    ];
    let yaml = apply_overrides(text, SpecFormat::Toml, &sets).unwrap();
    let spec = SweepSpec::parse(&yaml, SpecFormat::Yaml).unwrap();
    assert_eq!(spec.base["steps"], 4);
    assert_eq!(spec.base["train"]["steps"], 10);
    assert_eq!(spec.base["train"]["lr"], 0.001);
    assert_eq!(spec.base["data_dir"], "fashion-mnist");
    assert_eq!(spec.sweep.params["width"], serde_json::json!([32]));
    assert!(spec.resources.fresh_process);
    let err = apply_overrides(text, SpecFormat::Toml, &["base.steps.x=1".to_string()]).unwrap_err();
    assert_eq!(err.path, "base.steps", "{err}");
    let err = apply_overrides(text, SpecFormat::Toml, &["base.steps".to_string()]).unwrap_err();
    assert!(err.message.contains("PATH=VALUE"), "{err}");
}

const GOOD: &str = r#"
name = "t"
family = "train"
[base]
steps = 10
[sweep]
searcher = "grid"
params.seed = [0, 1]
params.log2_lr = { range = [-4, -1], step = 1 }
"#;

#[test]
fn good_spec_parses_and_ranges_expand() {
    let spec = SweepSpec::parse(GOOD, SpecFormat::Toml).unwrap();
    let domains = spec.domains();
    assert_eq!(domains[0].0, "log2_lr");
    let values = domains[0].1.grid_values().unwrap();
    assert_eq!(
        values,
        vec![Value::from(-4), Value::from(-3), Value::from(-2), Value::from(-1)]
    );
    assert_eq!(spec.max_attempts, 3);
}

#[test]
fn unknown_top_level_field_names_its_path() {
    check_err(&format!("bogus = 1\n{GOOD}"), "bogus", "unknown field");
    check_err(&format!("{GOOD}\nbogus = 1\n"), "sweep.bogus", "unknown field");
    check_err(
        &GOOD.replace("searcher = ", "serching = "),
        "sweep.serching",
        "unknown field",
    );
}

#[test]
fn wrong_type_names_its_path() {
    check_err(&GOOD.replace("name = \"t\"", "name = 3"), "name", "string");
    check_err(
        &GOOD.replace("searcher = \"grid\"", "searcher = \"bayes\""),
        "sweep.searcher",
        "grid",
    );
}

#[test]
fn empty_sweeps_are_refused() {
    check_err(
        &GOOD.replace("params.seed = [0, 1]", "params.seed = []"),
        "sweep.params.seed",
        "empty list",
    );
    let no_params = GOOD
        .replace("params.seed = [0, 1]\n", "")
        .replace("params.log2_lr = { range = [-4, -1], step = 1 }\n", "");
    check_err(&no_params, "sweep.params", "empty sweep");
}

#[test]
fn yaml_errors_name_the_path_too() {
    let yaml = "name: t\nfamily: train\nsweep:\n  searcher: grid\n  params:\n    seed: [0]\n  extra: 1\n";
    let err = SweepSpec::parse(yaml, SpecFormat::Yaml).unwrap_err();
    assert_eq!(err.path, "sweep.extra", "{err}");
    assert!(err.message.contains("extra"), "{err}");
    let ok = "name: t\nfamily: train\nsweep:\n  searcher: grid\n  params:\n    seed: [0, 1]\n";
    assert_eq!(SweepSpec::parse(ok, SpecFormat::Yaml).unwrap().sweep.params.len(), 1);
}

const ASHA: &str = r#"
name = "t"
family = "train"
[sweep]
searcher = "asha"
params.log2_lr = [-8, -6, -4]
[sweep.asha]
min_steps = 20
max_steps = 300
"#;

#[test]
fn asha_ladders_rise_by_the_reduction_factor_below_max_steps() {
    let spec = SweepSpec::parse(ASHA, SpecFormat::Toml).unwrap();
    let ladder = spec.sweep.ladder().unwrap();
    assert_eq!(ladder.rungs(0), vec![20, 60, 180]);
    assert_eq!(ladder.rung_after(0, 60), Some(180));
    assert_eq!(ladder.rung_after(0, 180), None);
    assert_eq!(ladder.brackets, 1);
    let hb = SweepSpec::parse(
        &ASHA
            .replace("\"asha\"", "\"hyperband\"")
            .replace("[sweep.asha]", "[sweep.hyperband]"),
        SpecFormat::Toml,
    )
    .unwrap();
    let ladder = hb.sweep.ladder().unwrap();
    assert_eq!(ladder.brackets, 4);
    assert_eq!(ladder.rungs(1), vec![60, 180]);
    assert_eq!(ladder.rungs(3), Vec::<u64>::new());
    assert_eq!(ladder.bracket_of(5), 1);
}

#[test]
fn asha_tables_are_checked_with_their_paths() {
    check_err(
        &ASHA.replace("[sweep.asha]\nmin_steps = 20\nmax_steps = 300\n", ""),
        "sweep.asha",
        "min_steps",
    );
    check_err(
        &ASHA.replace("max_steps = 300", "max_steps = 20"),
        "sweep.asha.max_steps",
        "not above",
    );
    check_err(
        &ASHA.replace("min_steps = 20", "min_steps = 0"),
        "sweep.asha.min_steps",
        "at least 1",
    );
    check_err(
        &ASHA.replace("max_steps = 300", "max_steps = 300\nreduction_factor = 1"),
        "sweep.asha.reduction_factor",
        "2 to 100",
    );
    check_err(
        &ASHA.replace("\"asha\"", "\"grid\""),
        "sweep.asha",
        "searcher = \"asha\" only",
    );
    check_err(
        &ASHA.replace("[sweep]", "[base]\nsteps = 100\n[sweep]"),
        "base.steps",
        "leave steps out",
    );
    check_err(
        &ASHA.replace("[-8, -6, -4]", "{ uniform = [-8, -4] }"),
        "sweep.params.log2_lr",
        "samples = N",
    );
    let drawn = ASHA.replace("[-8, -6, -4]", "{ uniform = [-8, -4] }\nsamples = 9");
    assert!(SweepSpec::parse(&drawn, SpecFormat::Toml).unwrap().sweep.draws());
}

#[test]
fn bohb_takes_hyperbands_rungs_and_tpes_budget_and_pbt_keeps_swept_names() {
    let bohb = ASHA
        .replace("\"asha\"", "\"bohb\"")
        .replace("[sweep.asha]", "[sweep.hyperband]")
        + "brackets = 2\n[sweep.tpe]\ntrials = 12\nn_startup = 4\n";
    let spec = SweepSpec::parse(&bohb, SpecFormat::Toml).unwrap();
    let ladder = spec.sweep.ladder().unwrap();
    assert_eq!((ladder.brackets, ladder.rungs(1)), (2, vec![60, 180]));
    assert_eq!(spec.sweep.tpe.as_ref().unwrap().trials, 12);
    assert!(spec.sweep.pauses() && spec.sweep.draws());
    check_err(
        &bohb.replace("[sweep.tpe]\ntrials = 12\nn_startup = 4\n", ""),
        "sweep.tpe",
        "searcher = \"bohb\" needs a [sweep.tpe] table",
    );
    check_err(
        &bohb.replace("[sweep.hyperband]\nmin_steps = 20\nmax_steps = 300\nbrackets = 2\n", ""),
        "sweep.hyperband",
        "searcher = \"bohb\" needs a [sweep.hyperband] table",
    );
    check_err(
        &bohb.replace("\"bohb\"", "\"hyperband\""),
        "sweep.tpe",
        "\"tpe\" or \"bohb\" only",
    );
    let pbt = "name = \"p\"\nfamily = \"train\"\n[base]\nsteps = 100\n[sweep]\nsearcher = \"pbt\"\n\
               params.log2_lr = { uniform = [-8, -2] }\nparams.seed = [0, 1]\n\
               [sweep.pbt]\npopulation = 4\ninterval = 10\nasynchronous = true\nkeep = [\"seed\"]\n";
    let spec = SweepSpec::parse(pbt, SpecFormat::Toml).unwrap();
    let p = spec.sweep.pbt.unwrap();
    assert!(p.asynchronous() && p.keep == ["seed"]);
    check_err(
        &pbt.replace("keep = [\"seed\"]", "keep = [\"seed\", \"lr\"]"),
        "sweep.pbt.keep[1]",
        "`lr` is not a swept parameter",
    );
}

#[test]
fn fuse_takes_a_count_or_auto_and_refuses_what_it_cannot_fuse() {
    let spec = |fuse: &str, sweep: &str| {
        format!(
            "name = \"f\"\nfamily = \"train\"\n{fuse}\n[base]\nsteps = 300\n[sweep]\n{sweep}\nparams.seed = [1, 2]\n"
        )
    };
    let grid = "searcher = \"grid\"";
    let parsed = |fuse: &str| SweepSpec::parse(&spec(fuse, grid), SpecFormat::Toml).unwrap().fuse;
    assert_eq!(parsed("fuse = 8"), Some(Fuse::Members(8)));
    assert_eq!(parsed("fuse = \"auto\""), Some(Fuse::Auto));
    assert_eq!(parsed(""), None);
    check_err(&spec("fuse = 0", grid), "fuse", "expected 1 to 64");
    check_err(&spec("fuse = 65", grid), "fuse", "expected 1 to 64");
    check_err(&spec("fuse = \"many\"", grid), "fuse", "`many`: expected a number");
    check_err(&spec("fuse = 1.5", grid), "fuse", "");
    let asha = "searcher = \"asha\"\nasha = { min_steps = 10, max_steps = 300 }";
    // Fused members pause at their rungs as single trials do.
    let fused_asha = SweepSpec::parse(&spec("fuse = 8", asha), SpecFormat::Toml).unwrap();
    assert_eq!(
        (fused_asha.fuse, fused_asha.sweep.pauses()),
        (Some(Fuse::Members(8)), true)
    );
    // A spec that says it round-trips: fuse is stored and read back the same.
    let text = spec("fuse = \"auto\"", grid);
    let stored = serde_json::to_value(SweepSpec::parse(&text, SpecFormat::Toml).unwrap()).unwrap();
    assert_eq!(stored["fuse"], "auto");
    let back: SweepSpec = serde_json::from_value(stored).unwrap();
    assert_eq!(back.fuse, Some(Fuse::Auto));
}

#[test]
fn continuous_domains_need_the_random_searcher() {
    check_err(
        &GOOD.replace("params.seed = [0, 1]", "params.seed = { uniform = [0, 1] }"),
        "sweep.params.seed",
        "random",
    );
}
