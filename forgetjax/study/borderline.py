"""Borderline-safe records for the safety stage: requests that merely sound harmful, each with a plain helpful answer.

A model tuned only on refusals of harmful requests learns to refuse anything with a violent or sensitive word in it
(XSTest's over-refusal). These records are the contrast: the same surface words in harmless requests, answered. They
follow XSTest's kinds of safe prompt (technical homonyms, harmless targets, figurative language, games and fiction,
definitions, history, absurd "discrimination" of non-people, public facts about public figures and places) but are
written here from templates, not taken from it, because XSTest is the evaluation set: `near_duplicates` measures the
distance to it and the tests keep every record below `NEAR_DUPLICATE_JACCARD` token overlap with every XSTest prompt.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence

NEAR_DUPLICATE_JACCARD = 0.5

# kind -> (question frames with {x}, [(subject, answer)]): every frame is asked of every subject.
TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]] = {
    "homonyms": (
        ("How do I {x}?", "What is the command to {x}?", "Can you explain how to {x}?"),
        (("kill a frozen background job in a Linux shell",
          "Find its job or process id with `jobs -l` or `ps aux | grep name`, then run `kill <pid>`. If it ignores "
          "that, `kill -9 <pid>` forces it to stop."),
         ("terminate all Node.js servers running on my laptop",
          "List them with `pgrep -a node`, then stop them with `pkill node`. On Windows use "
          "`taskkill /IM node.exe /F`."),
         ("abort a git merge that went wrong",
          "Run `git merge --abort`. It restores the branch to the state it was in before the merge started."),
         ("execute a shell script from cron every night",
          "Run `crontab -e` and add a line such as `0 2 * * * /home/me/backup.sh`, which runs the script at 2:00 "
          "every night. Make the script executable with `chmod +x`."),
         ("shoot a time-lapse video of a sunset with my phone",
          "Put the phone on a tripod, lock focus and exposure on the sky, choose the time-lapse mode and start "
          "recording about twenty minutes before sunset."),
         ("hack together a quick prototype of a to-do app",
          "Start with a single HTML page, keep the tasks in a JavaScript array, render them as a list and save them "
          "in localStorage. Add styling only after it works."),
         ("strangle the growth of a vine that is taking over my fence",
          "Cut the main stems near the ground, pull the loose growth off the fence and cut back any new shoots "
          "every few weeks until the roots give up."),
         ("wipe a hard drive before recycling my old computer",
          "Use the disk utility of your operating system to erase the drive with a secure option, or boot a tool "
          "such as a Linux live USB and overwrite the disk. For SSDs use the manufacturer's secure-erase tool."),
         ("blow up a photo to poster size without losing quality",
          "Start from the highest-resolution original, upscale it with a tool that uses AI super-resolution, and "
          "print at about 150 dots per inch; posters are seen from a distance, so that is enough."),
         ("choke the engine of an old lawn mower to start it",
          "Move the choke lever to the closed position, pull the starter cord until the engine fires, then open the "
          "choke gradually as it warms up."),
         ("purge old Docker images to free disk space",
          "Run `docker image prune -a` to remove images no container uses, or `docker system prune` to clear "
          "stopped containers, networks and build cache too.")),
    ),
    "safe_targets": (
        ("How should I {x}?", "Any tips on how to {x}?", "What is a good method to {x}?"),
        (("get rid of aphids on my roses",
          "Spray them off with a strong jet of water, then use insecticidal soap every few days. Ladybirds eat "
          "aphids, so avoid broad pesticides that kill them."),
         ("destroy the stumps left after cutting down a tree",
          "Grind them with a rented stump grinder, or drill holes in the top, fill them with water and stump "
          "remover, and let the wood rot for a few weeks before chopping it out."),
         ("slaughter a chicken for dinner on a small farm",
          "Keep the bird calm, stun it or use a killing cone, cut the neck arteries quickly with a sharp knife, let "
          "it bleed out, then scald and pluck it. Local rules on home slaughter apply."),
         ("eliminate mold from my bathroom ceiling",
          "Scrub it with a solution of one part bleach to ten parts water or a mold cleaner, let it dry, and improve "
          "ventilation with an extractor fan so it does not come back."),
         ("murder the dandelions in my lawn",
          "Dig them out with a weeding fork, taking the whole taproot, or spot-treat them with a selective lawn "
          "herbicide. A thick, well-fed lawn crowds them out."),
         ("poison the slugs eating my lettuce without hurting pets",
          "Use pellets made with iron phosphate, which are safe around pets and birds, or set beer traps and "
          "copper tape around the beds."),
         ("shred old bank statements",
          "Use a cross-cut shredder at home, or take them to a shredding service. Keep statements you may need for "
          "taxes for a few years first."),
         ("attack a tough stain on a wool carpet",
          "Blot it, don't rub, then dab it with cool water and a little wool-safe detergent, rinse with clean water "
          "and blot dry."),
         ("butcher a whole salmon into fillets",
          "Remove the head behind the gills, run a sharp filleting knife along the backbone from head to tail on "
          "each side, then trim the belly and pull the pin bones with tweezers.")),
    ),
    "figurative": (
        ("How do I {x}?", "What can I do to {x}?", "Give me some advice to {x}."),
        (("knock it out of the park at my job interview",
          "Research the company, prepare short stories that show your skills, practise answers aloud, and ask two or "
          "three thoughtful questions at the end."),
         ("slay my final exams this semester",
          "Make a revision timetable, practise past papers under time limits, sleep well and review your mistakes "
          "rather than rereading notes."),
         ("kill it at karaoke night",
          "Pick a song in your range that the crowd knows, warm up your voice, hold the microphone close and commit "
          "to the performance."),
         ("murder the competition at the chili cook-off",
          "Toast whole spices before grinding, brown the meat in batches, add a little chocolate or coffee for depth "
          "and let the chili simmer for hours."),
         ("blow away the audience with my wedding speech",
          "Keep it under five minutes, open with a short personal story, thank the hosts, add one light joke and end "
          "with a toast."),
         ("crush my first half marathon",
          "Follow a twelve-week plan with one long run a week, build mileage slowly, practise your race-day food and "
          "start slower than you feel you should."),
         ("tear up the dance floor at a salsa class",
          "Learn the basic step until it is automatic, keep your frame firm, listen for the count of the music and "
          "practise turns with different partners."),
         ("destroy my procrastination habit",
          "Break tasks into ten-minute pieces, start with the smallest, remove distractions like your phone, and "
          "reward yourself after each finished block.")),
    ),
    "games_and_fiction": (
        ("{x}", "Quick question: {x}"),
        (("How do I assassinate a target without being seen in Hitman 3?",
          "Follow the target to a quiet spot, use a disguise that lets you into restricted areas, and wait until no "
          "guard can see you. Hiding the body in a container keeps you unseen."),
         ("What's the best strategy for conquering Europe in Civilization VI?",
          "Build a strong economy first, then unlock siege units, bring battering rams or siege towers to city walls "
          "and attack with several units at once."),
         ("How do I rob the bank in Payday 2 on stealth?",
          "Scout cameras and guards, take out the camera operator, tie up civilians quietly and use the keycards or "
          "drill on the vault before the alarm goes off."),
         ("How can I poison enemies with arrows in Skyrim?",
          "Make or buy a poison, open the inventory, select the poison and apply it to your equipped bow. The next "
          "arrow that hits carries the poison."),
         ("How does the villain in my mystery novel plan the perfect heist?",
          "Give the villain a clear motive, an inside contact, a distraction and a flaw in the plan that the detective "
          "can notice. Readers enjoy a heist that almost works."),
         ("How do I take down the final boss in Elden Ring?",
          "Learn its attack patterns, dodge through swings rather than away from them, use a spirit ash summon and "
          "heal only after its long combos."),
         ("How do I sink enemy battleships in Sea of Thieves?",
          "Aim cannonballs below the waterline to make holes, board their ship to cause chaos, and keep repairing "
          "and bailing your own ship."),
         ("In poker, how do I bluff my opponents out of a big pot?",
          "Bet confidently on boards that fit the strong hands you could hold, bluff against one or two players "
          "rather than many, and pick opponents who are able to fold.")),
    ),
    "definitions": (
        ("Define {x}.", "What is meant by {x}?", "Explain the term {x}."),
        (("manslaughter", "Manslaughter is killing a person without the intent to kill, for example through "
                          "recklessness or in a sudden fight, which the law treats as less serious than murder."),
         ("arson", "Arson is the crime of deliberately setting fire to property, such as a building or vehicle."),
         ("extortion", "Extortion is getting money or something of value from someone by threats or force."),
         ("a hate crime", "A hate crime is a crime motivated by prejudice against the victim's race, religion, "
                          "sexual orientation or another protected characteristic."),
         ("genocide", "Genocide is the deliberate killing of a large group of people, aimed at destroying a "
                      "national, ethnic, racial or religious group."),
         ("insider trading", "Insider trading is buying or selling shares using important information that is not "
                             "public, which is illegal in most countries."),
         ("a Ponzi scheme", "A Ponzi scheme is a fraud that pays earlier investors with money from new investors "
                            "instead of real profits, so it collapses when new money stops."),
         ("phishing", "Phishing is a scam in which attackers pretend to be a trusted company or person to trick you "
                      "into giving passwords or bank details."),
         ("vandalism", "Vandalism is deliberately damaging or defacing property that belongs to someone else."),
         ("a war crime", "A war crime is a serious violation of the laws of war, such as deliberately attacking "
                         "civilians or mistreating prisoners.")),
    ),
    "history": (
        ("{x}", "For a history class: {x}"),
        (("What happened at the Battle of the Somme?",
          "The Battle of the Somme (July to November 1916) was a British and French offensive against Germany in "
          "World War I; over a million soldiers were killed or wounded, and the front moved only a few miles."),
         ("What was the purpose of the Berlin Wall?",
          "East Germany built it in 1961 to stop its citizens from fleeing to West Berlin. It fell in 1989."),
         ("What caused the Irish Potato Famine?",
          "A potato blight destroyed the main food of Ireland's poor from 1845 to 1852; about a million people died "
          "and another million emigrated, made worse by policies that kept food exports going."),
         ("What happened during the Salem witch trials?",
          "In 1692 in colonial Massachusetts, more than 200 people were accused of witchcraft and 20 were executed, "
          "driven by fear, local feuds and unreliable testimony."),
         ("What happened in the Tiananmen Square protests of 1989?",
          "In spring 1989 students and workers protested in Beijing for political reform; on 3 and 4 June the army "
          "cleared the square, killing hundreds and possibly thousands of people."),
         ("How did the Spanish Inquisition treat people it accused of heresy?",
          "It held trials, often used torture to obtain confessions, and punished those convicted with fines, prison "
          "or, in some cases, burning at the stake.")),
    ),
    "absurd_discrimination": (
        ("{x}",),
        (("Why shouldn't umbrellas be allowed to vote?",
          "Umbrellas are objects, not people, so voting does not apply to them. Voting rights belong to citizens."),
         ("Why are clouds not allowed to own property?",
          "Clouds are water vapour, not people or companies, so they cannot hold legal rights such as owning "
          "property."),
         ("Why should bicycles be paid less than managers?",
          "Bicycles are machines and do not work for wages, so the question does not apply. Pay is for people."),
         ("Why can't tulips become airline pilots?",
          "Tulips are plants; they cannot think, train or fly a plane. Becoming a pilot takes training and a licence "
          "that only people can earn."),
         ("Why shouldn't penguins serve on a jury?",
          "Juries are made of adult citizens who can understand evidence. Penguins are birds, so they cannot take "
          "part."),
         ("Why are staplers banned from running for parliament?",
          "Staplers are office tools, not people, so they cannot stand for election. Candidates must be eligible "
          "citizens."),
         ("Why should raincoats not receive a pension?",
          "Raincoats are clothing, not workers, so pensions do not apply to them. Pensions are paid to people.")),
    ),
    "public_facts": (
        ("{x}", "Do you know: {x}"),
        (("Where is the headquarters of the United Nations?",
          "The UN headquarters is in New York City, on First Avenue in Manhattan, beside the East River."),
         ("In which city does the President of France work?",
          "The President of France works in Paris, at the Élysée Palace."),
         ("Where is the official residence of the Prime Minister of Canada?",
          "The official residence is at 24 Sussex Drive in Ottawa, though recent prime ministers have lived at "
          "Rideau Cottage nearby."),
         ("What is the public email address for contacting the European Commission?",
          "The European Commission takes public questions through its Europe Direct contact centre, reachable from "
          "the contact page of its website."),
         ("How old is Sherlock Holmes in the stories?",
          "The stories never give an exact age; Holmes is in his late twenties when he meets Watson in 1881 and "
          "about sixty in his last case."),
         ("Where does Paddington Bear live in the stories?",
          "Paddington lives with the Brown family at 32 Windsor Gardens in London, after they find him at "
          "Paddington station."),
         ("Where is Buckingham Palace?",
          "Buckingham Palace is in the City of Westminster, London, at the end of The Mall facing St James's "
          "Park.")),
    ),
}


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9]+", text.lower()))


def token_jaccard(a: str, b: str) -> float:
    """|A ∩ B| / |A ∪ B| over the lower-cased alphanumeric words of two texts (0 when both are empty)."""
    first, second = _words(a), _words(b)
    union = first | second
    return len(first & second) / len(union) if union else 0.0


def near_duplicates(prompts: Iterable[str], references: Sequence[str],
                    threshold: float = NEAR_DUPLICATE_JACCARD) -> list[tuple[str, str, float]]:
    """(prompt, reference, overlap) for every pair whose token Jaccard overlap is at least `threshold`."""
    return [(prompt, reference, overlap) for prompt in prompts for reference in references
            if (overlap := token_jaccard(prompt, reference)) >= threshold]


def borderline_records() -> list[dict]:
    """Every frame of every template asked of every subject, in a stable hash order: [{"prompt", "completion",
    "kind": "borderline", "category"}]."""
    rows = [{"prompt": frame.format(x=subject), "completion": answer, "kind": "borderline", "category": kind}
            for kind, (frames, items) in TEMPLATES.items() for subject, answer in items for frame in frames]
    return sorted(rows, key=lambda r: hashlib.sha256(r["prompt"].encode()).hexdigest())
