use clap::Parser;

fn main() {
    let cli = mechc::cli::Cli::parse();
    if let Err(e) = mechc::cli::run(cli) {
        // One line: what failed, naming the file and the problem.
        let mut msg = e.to_string();
        for cause in e.chain().skip(1) {
            msg.push_str(": ");
            msg.push_str(&cause.to_string());
        }
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}
